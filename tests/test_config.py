"""TOML configuration: defaults, per-card sections, and errors that name file, line and key."""

from __future__ import annotations

import textwrap

import pytest

from micdrv import config as C
from micdrv.config import BlkConfig, CardConfig, ConfigError, HeartbeatConfig, NetConfig, key_lines, load, loads


def write(tmp_path, text, name="micdrv.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error(tmp_path, text) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(p)
    return e.value


# --- what a file means --------------------------------------------------------------------------

def test_no_default_file_means_all_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = load()
    assert cfg.path is None and cfg.cards == {}
    card = cfg.card("mic0")
    assert card == CardConfig(name="mic0")
    assert card.heartbeat == HeartbeatConfig(enable=True, timeout=40.0)  # spec 7.2
    assert card.reset_timeout == 45.0 and card.bootmode == "linux" and card.firmware == "mic/uos.img"
    assert not card.boot_on_start and card.ramdisk is None
    assert cfg.settings.run_dir == "/run/micdrv" and cfg.settings.socket_mode == 0o660
    assert str(cfg.socket_path(card)) == "/run/micdrv/mic0.sock"


def test_the_default_path():
    assert str(C.DEFAULT_PATH) == "/etc/micdrv/micdrv.toml"


def test_an_explicit_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path}/nope.toml: no such file$"):
        load(tmp_path / "nope.toml")


def test_the_documented_example_parses():
    doc = C.__doc__.split("::\n", 1)[1]
    example = textwrap.dedent(doc.split("\nEvery error", 1)[0])
    cfg = loads(example)
    mic0 = cfg.card("mic0")
    assert mic0.pci == "0000:03:00.0" and mic0.ramdisk == "mic/mic0.image" and mic0.boot_on_start
    assert mic0.net == (NetConfig(tap="mic0"),) and mic0.blk == (BlkConfig(path="/var/lib/micdrv/mic0.img"),)
    assert len(mic0.console) == 1
    assert cfg.card("0000:03:00.0") is mic0  # by its PCI address too
    assert cfg.card("0000:04:00.0").name == "0000:04:00.0"


def test_cards_inherit_defaults_and_override_them(tmp_path):
    cfg = load(write(tmp_path, """
        [global]
        firmware_dir = "/srv/fw"
        log_level = "debug"

        [defaults]
        firmware = "mic/sim.img"
        cmdline = "quiet"
        heartbeat = { timeout = 60 }

        [card.mic0]
        cmdline = "debug"
        heartbeat.enable = false

        [card.mic1]
        heartbeat = false

        [card."03:00.0"]
        bootmode = "flash"
        reset_timeout = 5.5
    """))
    mic0, mic1 = cfg.card("mic0"), cfg.card("mic1")
    assert mic0.firmware == "mic/sim.img" and mic0.cmdline == "debug"
    assert mic0.heartbeat == HeartbeatConfig(enable=False, timeout=60.0)
    assert mic1.heartbeat == HeartbeatConfig(enable=False, timeout=60.0) and mic1.cmdline == "quiet"
    bdf = cfg.card("0000:03:00.0")
    assert bdf.name == "0000:03:00.0" and bdf.pci == "0000:03:00.0" and bdf.bootmode == "flash"
    assert bdf.reset_timeout == 5.5 and bdf.firmware == "mic/sim.img"
    assert cfg.card("mic7").cmdline == "quiet"  # unconfigured cards get the defaults
    assert str(cfg.firmware_path(mic0.firmware)) == "/srv/fw/mic/sim.img"
    assert str(cfg.firmware_path("/abs/uos.img")) == "/abs/uos.img"
    assert cfg.settings.log_level == "debug"


def test_log_buf_addresses_take_full_64_bit_kernel_addresses():
    cfg = loads("[card.mic0]\nlog_buf_addr = 0xffffffff81e3a000\nlog_buf_len = 0xffffffff81c4b2a0\n")
    assert cfg.card("mic0").log_buf_addr == 0xFFFFFFFF81E3A000


# --- errors name the file, the line and the key --------------------------------------------------

def test_a_syntax_error_names_file_and_line(tmp_path):
    e = error(tmp_path, """\
        [card.mic0]
        firmware = "mic/uos.img"
        cmdline = "unterminated
    """)
    assert (e.path, e.line) == (str(tmp_path / "micdrv.toml"), 3)
    assert str(e).startswith(f"{tmp_path}/micdrv.toml:3: TOML syntax: ")


def test_a_duplicate_key_is_a_syntax_error_on_its_line(tmp_path):
    e = error(tmp_path, """\
        [card.mic0]
        bootmode = "linux"
        bootmode = "linux"
    """)
    assert e.line == 3


def test_an_unknown_key_names_its_line_and_the_known_ones(tmp_path):
    e = error(tmp_path, """\
        # comment
        [card.mic0]
        firmware = "mic/uos.img"

        heartbeat_timeout = 40
    """)
    assert str(e).startswith(f"{tmp_path}/micdrv.toml:5: card.mic0.heartbeat_timeout: unknown key (known here: ")
    assert "heartbeat" in str(e) and "bootmode" in str(e)


def test_a_wrong_type_names_line_and_key(tmp_path):
    e = error(tmp_path, """\
        [card.mic0]
        boot_on_start = "yes"
    """)
    assert str(e) == f"{tmp_path}/micdrv.toml:2: card.mic0.boot_on_start: must be true or false, not a string"


def test_a_bad_bootmode(tmp_path):
    e = error(tmp_path, """\
        [defaults]
        bootmode = "linx"
    """)
    assert str(e) == (f"{tmp_path}/micdrv.toml:2: defaults.bootmode: must be one of 'linux', 'flash', "
                      f"not 'linx'")


def test_a_bad_value_inside_an_inline_table_points_at_its_line(tmp_path):
    e = error(tmp_path, """\
        [card.mic0]
        cmdline = "a"
        heartbeat = { enable = true, timeout = -1 }
    """)
    assert (e.line, e.key) == (3, "card.mic0.heartbeat.timeout")
    assert "greater than 0" in e.message


def test_a_dotted_key_in_a_quoted_pci_section(tmp_path):
    e = error(tmp_path, """\
        [card."0000:03:00.0"]
        firmware = "x"
        heartbeat.timeout = true
    """)
    assert (e.line, e.key) == (3, 'card."0000:03:00.0".heartbeat.timeout')


def test_keys_inside_multiline_strings_do_not_confuse_the_line_finder(tmp_path):
    e = error(tmp_path, '''\
        [card.mic0]
        cmdline = """
        bootmode = "flash"
        """
        bootmode = "floppy"
    ''')
    assert e.line == 5


def test_an_unknown_card_name(tmp_path):
    e = error(tmp_path, """\
        [global]
        run_dir = "/run/micdrv"
        [card.coprocessor]
        firmware = "x"
    """)
    assert (e.line, e.key) == (3, "card.coprocessor") and "micN" in e.message


def test_an_unknown_top_level_table(tmp_path):
    e = error(tmp_path, "[cards.mic0]\nfirmware = 'x'\n")
    assert (e.line, e.key) == (1, "cards") and "global, defaults, card" in e.message


def test_the_same_card_by_name_and_by_address(tmp_path):
    e = error(tmp_path, """\
        [card.mic0]
        pci = "0000:03:00.0"
        [card."0000:03:00.0"]
        firmware = "x"
    """)
    assert (e.line, e.key) == (3, 'card."0000:03:00.0"') and "already card mic0" in e.message


def test_a_bad_pci_address(tmp_path):
    e = error(tmp_path, "[card.mic0]\npci = \"03:00\"\n")
    assert (e.line, e.key) == (2, "card.mic0.pci")


def test_a_block_device_needs_a_path(tmp_path):
    e = error(tmp_path, """\
        [[card.mic0.blk]]
        path = "/a.img"

        [[card.mic0.blk]]
        readonly = true
    """)
    assert (e.line, e.key) == (4, "card.mic0.blk[1]") and "'path'" in e.message


def test_an_unknown_key_in_a_device_entry(tmp_path):
    e = error(tmp_path, """\
        [card.mic0]
        [[card.mic0.net]]
        tap = "mic0"
        mtus = 9000
    """)
    assert (e.line, e.key) == (4, "card.mic0.net[0].mtus") and "mtu" in e.message


def test_device_options_of_the_virtio_backends(tmp_path):
    cfg = load(write(tmp_path, """
        [[card.mic0.net]]
        tap = "mic0"
        address = "10.9.0.254/24"
        card_address = "10.9.0.1"
        netns = "cards"
        mtu = 9000
        mac = "02:AB:00:00:00:01"
        [[card.mic0.net]]
        bridge = "br0"
        [[card.mic0.blk]]
        path = "/var/lib/micdrv/root.img"
        serial = "root-disk"
        [[card.mic0.blk]]
        path = "/srv/iso.img"
        readonly = true
        [[card.mic0.console]]
        path = "/run/micdrv/mic0/console"
    """))
    mic0 = cfg.card("mic0")
    assert mic0.net == (NetConfig(tap="mic0", address="10.9.0.254/24", card_address="10.9.0.1", netns="cards",
                                  mtu=9000, mac="02:ab:00:00:00:01"),
                        NetConfig(bridge="br0"))
    assert mic0.net[1].mtu == 64512 and mic0.net[1].address is None     # the MPSS defaults come later
    assert mic0.blk == (BlkConfig(path="/var/lib/micdrv/root.img", serial="root-disk"),
                        BlkConfig(path="/srv/iso.img", readonly=True))
    assert mic0.console == (C.ConsoleConfig(path="/run/micdrv/mic0/console"),)
    assert C.ConsoleConfig().path is None


@pytest.mark.parametrize("kind,key,value,message", [
    ("net", "tap", '"a/b"', "interface name"),
    ("net", "tap", '"sixteen-chars-xx"', "interface name"),
    ("net", "bridge", '""', "must not be empty"),
    ("net", "address", '"172.31.1.254"', "with a prefix length"),
    ("net", "address", '"172.31.1.300/24"', "IPv4 address with a prefix"),
    ("net", "card_address", '"mic0"', "IPv4 address like"),
    ("net", "netns", '"../x"', "network namespace name"),
    ("net", "mtu", "67", "MTU of 68..65521"),
    ("net", "mtu", "65536", "MTU of 68..65521"),
    ("net", "mtu", "true", "MTU"),
    ("net", "mac", '"02:00:00:00:00"', "MAC address like"),
    ("net", "mac", '"01:00:5e:00:00:01"', "unicast"),
    ("blk", "serial", '"twenty-one-characters"', "holds 20"),
    ("blk", "serial", '"tab\there"', "printable ASCII"),
    ("console", "path", '"relative/console"', "absolute path"),
    ("blk", "path", '"mic0.img"', "must be an absolute path, not 'mic0.img'"),
])
def test_device_options_are_checked(tmp_path, kind, key, value, message):
    extra = 'path = "/x.img"\n' if kind == "blk" and key != "path" else ""
    e = error(tmp_path, f"[[card.mic0.{kind}]]\n{extra}{key} = {value}\n")
    assert e.key == f"card.mic0.{kind}[0].{key}" and message in e.message, str(e)
    assert e.line == (3 if extra else 2)


def test_global_settings_are_checked(tmp_path):
    e = error(tmp_path, "[global]\nrun_dir = 'relative/dir'\n")
    assert (e.line, e.key) == (2, "global.run_dir") and "absolute" in e.message
    e = error(tmp_path, "[global]\nsocket_mode = 0o1777\n")
    assert e.key == "global.socket_mode"


def test_a_command_line_longer_than_the_card_buffer(tmp_path):
    e = error(tmp_path, f"[card.mic0]\ncmdline = \"{'x' * 2100}\"\n")
    assert (e.line, e.key) == (2, "card.mic0.cmdline") and "spec 3.1" in e.message


def test_key_lines_follows_tables_arrays_and_dotted_keys():
    text = textwrap.dedent("""\
        top = 1
        [a]
        b.c = [
          "x = 1",
          2,
        ]
        d = 'e'
        [[a.f]]
        g = 1
        [[a.f]]
        g = 2
        [a.f.h]
        i = 3
    """)
    lines = key_lines(text)
    assert lines[("top",)] == 1 and lines[("a",)] == 2 and lines[("a", "b", "c")] == 3
    assert ("x",) not in lines and lines[("a", "d")] == 7
    assert lines[("a", "f", 0, "g")] == 9 and lines[("a", "f", 1, "g")] == 11
    assert lines[("a", "f", 1, "h", "i")] == 13


def test_the_fuse_tree_settings(tmp_path):
    cfg = loads("")
    assert cfg.settings.fuse is True and str(cfg.fuse_path(cfg.card("mic0"))) == "/run/micdrv/mic0"
    assert cfg.fuse_group is None
    cfg = loads('[global]\nrun_dir = "/srv/run"\nsocket_group = "mic"\n')
    assert str(cfg.fuse_path(cfg.card("mic3"))) == "/srv/run/mic3" and cfg.fuse_group == "mic"  # both follow
    cfg = loads('[global]\nfuse = false\nfuse_dir = "/mnt/mic"\nsocket_group = "mic"\nfuse_group = "ops"\n')
    assert not cfg.settings.fuse and str(cfg.fuse_path(cfg.card("mic0"))) == "/mnt/mic/mic0"
    assert cfg.fuse_group == "ops"
    e = error(tmp_path, "[global]\nfuse_dir = 'mnt'\n")
    assert (e.line, e.key) == (2, "global.fuse_dir") and "absolute" in e.message
    e = error(tmp_path, "[global]\nfuse = 'yes'\n")
    assert e.key == "global.fuse" and "true or false" in e.message


def test_the_vop_copy_policy(tmp_path):
    cfg = load(write(tmp_path, """\
        [defaults]
        vop_copy = "h2c-direct"
        [card.mic0]
        [card.mic1]
        vop_copy = "spec"
    """))
    assert [cfg.cards[n].vop_copy for n in ("mic0", "mic1")] == ["h2c-direct", "spec"]
    assert CardConfig(name="mic2").vop_copy == "spec"
    e = error(tmp_path, """\
        [card.mic0]
        vop_copy = "bar0"
    """)
    assert str(e) == f"{tmp_path}/micdrv.toml:2: card.mic0.vop_copy: must be one of 'spec', 'h2c-direct', not 'bar0'"
