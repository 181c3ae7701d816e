"""imgstore: a lazy, verified, content-addressed image store behind a FUSE mount."""
