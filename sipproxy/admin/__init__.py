"""The ``[admin]`` HTTP listener: Prometheus ``/metrics``, the JSON ``/api/...`` and the status
page, read from the running proxy (see :mod:`sipproxy.admin.service`)."""
