"""Model analysis (homework Q1, Q2.1): per-layer tables, self-attention identities, translation equivariance."""
