package orca.handlers.ec2.tasks.imgproxy;

/**
 * The fault class Axis2 1.1.1's wsdl2java made from the WSDL's Exception fault. The stub builds
 * it with this no-argument constructor, so its message is always the fixed text below.
 */
public class ExceptionException extends java.lang.Exception {
    public ExceptionException() {
        super("ExceptionException");
    }
}
