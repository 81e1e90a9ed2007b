"""VOP, virtio over PCIe: the host serving virtio devices to the card (spec 5).

* :mod:`.layout` -- the device page entries and the vring layout, shared with the simulated card.
"""
