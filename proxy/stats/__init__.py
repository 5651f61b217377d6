"""Per-second request statistics per upstream and target cluster, with mergeable histograms."""
