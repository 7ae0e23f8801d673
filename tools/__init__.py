"""Development tooling: the GPU run, the SASS report and the mutation check (not part of memcore)."""
