"""Volume backends: where a volume's bytes and its small key/value metadata live."""
