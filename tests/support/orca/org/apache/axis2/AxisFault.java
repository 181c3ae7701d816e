package org.apache.axis2;

/**
 * Stands in for Axis2 1.1's AxisFault, as far as ORCA's log sees it: a RemoteException built
 * from the faultstring, so toString() is "org.apache.axis2.AxisFault: " + faultstring.
 */
public class AxisFault extends java.rmi.RemoteException {
    public AxisFault(String message) {
        super(message);
    }
}
