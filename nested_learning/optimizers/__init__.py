"""Optimizers of the Nested Learning library: deep (learned-memory) momentum, its classical
special cases, and the orthogonalising Muon / M3."""
