"""The relay's settings: one reader, the same rules for the [media] keys and the twistd options."""

from __future__ import annotations

import pytest
from twisted.python import usage

from sipproxy.config import ConfigError, Section
from sipproxy.media import tap
from sipproxy.media.ports import RelayInterface
from sipproxy.media.settings import RelaySettings, check_port_range
from sipproxy.settings import read_section, settings_of


def from_file(**values: object) -> RelaySettings:
    """As the media plugin reads them: TOML values, errors named ``media.<key>``."""
    section = Section("media", values)
    settings = read_section(RelaySettings, section)
    check_port_range(settings, section)
    return settings


def from_options(*args: str) -> RelaySettings:
    """As ``twistd sipproxy-relay`` reads them: option text, errors named ``--<option>``."""
    options = tap.Options()
    options.parseOptions(list(args))
    return tap.relay_config(options)


def error(read: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        read(*args, **kwargs)  # type: ignore[operator]
    text = str(info.value)
    assert "\n" not in text
    return text


def test_defaults_are_the_fields_defaults() -> None:
    assert from_file() == RelaySettings()
    # the command line differs only where a relay on its own needs NG
    assert from_options() == RelaySettings(listen_ng=("127.0.0.1", 2223))


def test_both_read_the_same_values() -> None:
    file = from_file(port_min=31000, port_max=31003, timeout=30, silent_timeout=600.5,
                     offer_timeout=90, listen_ng="[::1]:2299", kernel=False,
                     kernel_table="mine")
    options = from_options("--port-min", "31000", "--port-max", "31003", "--timeout", "30",
                           "--silent-timeout", "600.5", "--offer-timeout", "90",
                           "--listen-ng", "[::1]:2299", "--kernel", "off",
                           "--kernel-table", "mine")
    assert file == options
    assert (file.port_min, file.timeout, file.listen_ng) == (31000, 30.0, ("::1", 2299))


@pytest.mark.parametrize(("key", "value", "option", "problem"), [
    ("port_min", 80, "80", "must be an integer from 1024 to 65534, got "),
    ("timeout", 0, "0", "must be a number from 1 to 86400, got "),
    ("offer_timeout", 700000, "700000", "must be a number from 1 to 604800, got "),
    ("listen_ng", "localhost:2223", "localhost:2223", "must be ADDRESS:PORT, got "),
    ("kernel_table", "a-b", "a-b", "must be an nftables name, got "),
])
def test_the_same_rule_names_the_key_each_way(
    key: str, value: object, option: str, problem: str
) -> None:
    assert error(from_file, **{key: value}).startswith(f"media.{key}: {problem}")
    name = "--" + key.replace("_", "-")
    assert error(from_options, name, option).startswith(f"{name}: {problem}")


def test_a_port_range_holds_one_call() -> None:
    # a call takes a port pair per party: a range of one pair could relay nothing
    wanted = "must be at least 30003 (room for 2 even/odd port pairs from 30000"
    assert wanted in error(from_file, port_min=30000, port_max=30001)
    assert error(from_options, "--port-min", "30000", "--port-max", "30001").startswith(
        f"--port-max: {wanted}")
    assert from_file(port_min=30000, port_max=30003).port_max == 30003
    # an odd port_min: the first pair starts above it
    assert "at least 30005" in error(from_file, port_min=30001, port_max=30004)


def test_types_are_config_file_types() -> None:
    # the config file gives typed values: text is not a number there, a float not a port
    assert error(from_file, port_min="30000").startswith("media.port_min: must be an integer")
    assert error(from_file, port_max=40000.0).startswith("media.port_max: must be an integer")
    assert error(from_file, timeout=True).startswith("media.timeout: must be a number")
    assert from_file(kernel=True).kernel == "on"
    assert error(from_file, kernel="yes").startswith('media.kernel: must be "auto", "on" or')
    assert error(from_options, "--kernel", "yes").startswith("--kernel: must be auto, on or off")


def test_interfaces() -> None:
    # not a key of [media]: the media plugin takes them from its listeners
    assert from_options("-i", "a/192.0.2.1!203.0.113.1").interfaces == (
        RelayInterface("a", "192.0.2.1", "203.0.113.1"),)
    assert error(from_options, "-i", "a/1.2.3.4", "-i", "a/1.2.3.5") == \
        '--interface: "a" given twice'
    assert error(from_options, "-i", "a/bogus") == \
        "--interface: not an IP address: 'bogus' in \"a/bogus\""


def test_every_setting_is_an_option_with_its_doc() -> None:
    help_text = " ".join(str(tap.Options()).split())
    for key, spec in settings_of(RelaySettings).items():
        assert f"--{key.replace('_', '-')}=" in help_text
        assert " ".join(spec.doc.split())[:40] in help_text
    with pytest.raises(usage.UsageError):
        from_options("--frobnicate")
