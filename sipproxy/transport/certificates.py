"""
Certificates named in the configuration, loaded when the config is read: a bad file stops the
proxy with one line naming the key at fault (``listen[1].key: key file ... does not match the
certificate in ...``), not at the first handshake.

Used for the ``[tls]`` client certificate; the TLS listeners' ``certificate``/``key`` of a
``[[listen]]`` entry are loaded the same way (``load_certificate_pair(Section("listen[1]"),
...)``).
"""

from __future__ import annotations

from sipproxy.settings import Section
from sipproxy.transport.tls import ServerCertificate, load_server_certificate

__all__ = ["load_certificate_pair"]


def load_certificate_pair(table: Section, certificate: str, key: str) -> ServerCertificate:
    """
    Load the PEM certificate (chain) at ``certificate`` and its private key at ``key``.

    :param table: the table whose ``certificate`` and ``key`` keys named the two files.
    :raises ConfigError: naming ``<table>.key`` for a key file that is missing or not an
        unencrypted PEM key, else ``<table>.certificate`` (a certificate file that is missing
        or not PEM, or a key that does not belong to the certificate).
    """
    try:
        return load_server_certificate(certificate, key)
    except ValueError as e:
        text = str(e)
        which = "key" if "key file" in text and "does not match" not in text else "certificate"
        raise table.error(which, text) from None
