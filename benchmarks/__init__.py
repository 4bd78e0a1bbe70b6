"""On-demand benchmarks; each writes its results to benchmarks/results/."""
