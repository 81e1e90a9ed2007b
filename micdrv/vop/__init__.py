"""VOP, virtio over PCIe: the host serving virtio devices to the card (spec 5).

* :mod:`.layout` -- the device page entries and the vring layout, shared with the simulated card;
* :mod:`.host` -- :class:`~.host.VopHost`, one per card: add / remove / config change (spec 5.3, 5.5),
  doorbells, the event loop the backends run on;
* :mod:`.device` -- :class:`~.device.VopDevice`, one device: the card's hand-shakes (used_address_updated,
  vdev_reset), status, activation, "broken";
* :mod:`.queue` -- :class:`~.queue.VopQueue`, the :class:`backends.virtqueue.Virtqueue` a backend sees;
* :mod:`.copy` -- the copy engine: DMA and BAR0 paths, their counters (spec 5.7);
* :mod:`.staging` -- where chain payload sits in the arena while a backend uses it;
* :mod:`.devices` -- :class:`~.devices.CardDevices`, a daemon's configured and hot-plugged devices.

The card's side is :mod:`micdrv.sim.cardos.vop`.
"""
