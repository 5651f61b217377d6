"""Regional health: probes, statistics, the failover controller and the dashboard."""
