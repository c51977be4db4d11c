"""Key management: KMS backends, DEK stores, and one volume's encryption (VolumeEncryption)."""
