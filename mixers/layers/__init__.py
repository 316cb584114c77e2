"""What a block puts around a mixer: norms, positions, the FFN and block, and the model heads."""
