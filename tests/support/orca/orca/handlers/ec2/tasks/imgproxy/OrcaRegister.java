package orca.handlers.ec2.tasks.imgproxy;

import java.io.ByteArrayOutputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.StringReader;
import java.net.HttpURLConnection;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import java.util.TreeSet;
import javax.xml.parsers.DocumentBuilderFactory;
import org.apache.axis2.AxisFault;
import org.w3c.dom.Document;
import org.w3c.dom.Element;
import org.w3c.dom.Node;

/**
 * ORCA 5's RegisterImage call, reduced to what decides the line in ORCA's log.
 *
 * Usage: OrcaRegister ENDPOINT URL SIGNATURE [soap11|soap12]
 *
 * It sends the envelope Axis2 1.1's ADB stub writes (chunked), then handles the reply the way
 * the generated stub does: for a fault, the stub takes the first element of the detail and, if
 * its QName is {http://imageproxy.orca}Exception, throws ExceptionException made with its
 * no-argument constructor (message "ExceptionException"); otherwise it rethrows the AxisFault,
 * whose message is the faultstring (SOAP 1.2: Reason/Text). ImgProxyRegisterTask logs
 * "ImageProxy unable to retrieve image: " + the exception, and loads the answer's return text
 * with java.util.Properties.
 *
 * Prints the ids (KEY=value, sorted) and exits 0, or prints ORCA's log line and exits 1.
 */
public final class OrcaRegister {
    static final String ORCA_NS = "http://imageproxy.orca";
    static final String S11 = "http://schemas.xmlsoap.org/soap/envelope/";
    static final String S12 = "http://www.w3.org/2003/05/soap-envelope";

    public static void main(String[] args) throws java.io.IOException {
        boolean soap12 = args.length > 3 && args[3].equals("soap12");
        try {
            String text = registerImage(args[0], args[1], args[2], soap12);
            Properties answer = new Properties();
            answer.load(new StringReader(text)); // no null check, as in ORCA
            for (String key : new TreeSet<>(answer.stringPropertyNames())) {
                System.out.println(key + "=" + answer.getProperty(key));
            }
        } catch (Exception e) {
            System.out.println("ImageProxy unable to retrieve image: " + e);
            System.exit(1);
        }
    }

    static String registerImage(String endpoint, String url, String signature, boolean soap12)
            throws Exception {
        String env = soap12 ? S12 : S11;
        String body = "<?xml version='1.0' encoding='UTF-8'?>"
                + "<soapenv:Envelope xmlns:soapenv=\"" + env + "\"><soapenv:Body>"
                + "<ns1:RegisterImage xmlns:ns1=\"" + ORCA_NS + "\">"
                + "<ns1:url>" + escape(url) + "</ns1:url>"
                + "<ns1:signature>" + escape(signature) + "</ns1:signature>"
                + "</ns1:RegisterImage></soapenv:Body></soapenv:Envelope>";
        HttpURLConnection conn = (HttpURLConnection) new URL(endpoint).openConnection();
        conn.setDoOutput(true);
        conn.setRequestMethod("POST");
        conn.setChunkedStreamingMode(100);
        conn.setRequestProperty("User-Agent", "Axis2");
        if (soap12) {
            conn.setRequestProperty("Content-Type",
                    "application/soap+xml; charset=UTF-8; action=\"urn:RegisterImage\"");
        } else {
            conn.setRequestProperty("Content-Type", "text/xml; charset=UTF-8");
            conn.setRequestProperty("SOAPAction", "\"urn:RegisterImage\"");
        }
        try (OutputStream out = conn.getOutputStream()) {
            out.write(body.getBytes(StandardCharsets.UTF_8));
        }
        int status = conn.getResponseCode();
        InputStream in = status < 400 ? conn.getInputStream() : conn.getErrorStream();
        if (in == null) {
            throw new AxisFault("Transport error: " + status);
        }
        ByteArrayOutputStream reply = new ByteArrayOutputStream();
        in.transferTo(reply);
        DocumentBuilderFactory factory = DocumentBuilderFactory.newInstance();
        factory.setNamespaceAware(true);
        Document doc = factory.newDocumentBuilder()
                .parse(new java.io.ByteArrayInputStream(reply.toByteArray()));
        Element bodyElt = firstChild(doc.getDocumentElement(), env, "Body");
        Element first = firstChild(bodyElt, null, null);
        if (first != null && env.equals(first.getNamespaceURI())
                && "Fault".equals(first.getLocalName())) {
            String faultstring;
            Element detail;
            if (soap12) {
                faultstring = text(firstChild(firstChild(first, S12, "Reason"), S12, "Text"));
                detail = firstChild(first, S12, "Detail");
            } else {
                faultstring = text(firstChild(first, "", "faultstring"));
                detail = firstChild(first, "", "detail");
            }
            Element faultElt = firstChild(detail, null, null);
            if (faultElt != null && ORCA_NS.equals(faultElt.getNamespaceURI())
                    && "Exception".equals(faultElt.getLocalName())) {
                throw new ExceptionException();
            }
            throw new AxisFault(faultstring);
        }
        Element ret = firstChild(first, ORCA_NS, "return");
        return ret == null ? null : text(ret);
    }

    /** The first child element of parent, matching ns/local unless null ("" = no namespace). */
    static Element firstChild(Element parent, String ns, String local) {
        if (parent == null) {
            return null;
        }
        for (Node n = parent.getFirstChild(); n != null; n = n.getNextSibling()) {
            if (n.getNodeType() != Node.ELEMENT_NODE) {
                continue;
            }
            String nodeNs = n.getNamespaceURI() == null ? "" : n.getNamespaceURI();
            if ((ns == null || ns.equals(nodeNs)) && (local == null || local.equals(n.getLocalName()))) {
                return (Element) n;
            }
        }
        return null;
    }

    static String text(Element e) {
        return e == null ? null : e.getTextContent();
    }

    static String escape(String s) {
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;");
    }
}
