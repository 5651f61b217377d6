"""Tests of the WAN emulator."""
