"""Model compression for the pack: FP8 linear layers (tdq) and other weight/activation formats."""
