"""registrar: answers ORCA's RegisterImage SOAP call by bundling and registering images."""
