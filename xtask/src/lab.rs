//! Lab: a bridge, node namespaces and a client namespace.
