"""Virtio device backends (net, blk, console).

Backends see virtqueues only: never a BAR, a register or a doorbell.
"""
