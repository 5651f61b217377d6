"""The user-space WAN emulator between the clusters of a local mesh (the kernel has no netem).

`core` decides what a link does to bytes (delay line with jitter, loss as retransmission
delay, bandwidth); `forwarder` moves them; `server` runs forwarders and the admin API.
"""
