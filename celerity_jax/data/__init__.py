"""Token sources. Batches are a pure function of (seed, step) so resume is instant and exact."""
