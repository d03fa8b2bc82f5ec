"""Helpers shared by the tests (and the registry benchmark), kept out of the installed packages.

``support.server``: a real ``forgedit-server`` in-process on a free loopback port (``Harness``,
``running_server``), request builders, the sample photos, and the resource check every service
and fault test ends with. ``support.registry``: edit models of real shapes with random tensors,
and a real ``mlflow server`` process on a loopback port.

``tests/`` is on ``sys.path`` (pytest puts the root conftest's folder there), so tests import
``from support.server import ...``.
"""
