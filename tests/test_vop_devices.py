"""The daemon's device list: what the configuration says about VOP, and the card's command line (spec 6.1, 6.5)."""

import pytest

from micdrv import config
from micdrv.vop.devices import CardDevices


def devices(text: str, card: str = "mic0") -> CardDevices:
    cfg = config.loads(text)
    return CardDevices(cfg.card(card), cfg, vop=None)


def test_the_card_address_goes_on_its_command_line_as_mpss_wrote_it():
    d = devices("[[card.mic0.net]]\n")
    assert d.kernel_cmdline("console=hvc0") == "console=hvc0 ifcfg=static;address,172.31.1.1;netmask,255.255.255.0"
    assert devices("[[card.mic2.net]]\n", "mic2").kernel_cmdline("") == \
        "ifcfg=static;address,172.31.3.1;netmask,255.255.255.0"


def test_a_configured_address_and_prefix_are_used():
    d = devices('[[card.mic0.net]]\naddress = "10.9.0.254/16"\ncard_address = "10.9.0.7"\n')
    assert d.kernel_cmdline("") == "ifcfg=static;address,10.9.0.7;netmask,255.255.0.0"


def test_an_ifcfg_already_there_or_no_net_device_leaves_the_command_line_alone():
    assert devices("[[card.mic0.net]]\n").kernel_cmdline("ifcfg=static;address,1.2.3.4") == \
        "ifcfg=static;address,1.2.3.4"
    assert devices("[[card.mic0.blk]]\npath = \"/x\"\n").kernel_cmdline("quiet") == "quiet"


def test_vring_info_is_rounded_by_default_and_legacy_on_request():
    assert config.loads("").card("mic0").vring_info == "rounded"
    assert config.loads('[card.mic0]\nvring_info = "legacy"\n').card("mic0").vring_info == "legacy"
    with pytest.raises(config.ConfigError, match="vring_info"):
        config.loads('[card.mic0]\nvring_info = "5128"\n')
