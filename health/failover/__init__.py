"""The latency-aware failover controller: its policy, its pure decision core and simulation."""
