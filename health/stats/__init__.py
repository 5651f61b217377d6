"""Regional statistics: sliding windows over the sidecars' stats, observations, summaries."""
