"""Where a scene is: a local file, or anything GDAL opens by name (``/vsicurl/``, http(s), ``/vsis3/``, ``s3://``).

``pathlib.Path`` folds the double slash of a URL (``/vsicurl/http://host/a.tif`` becomes
``/vsicurl/http:/host/a.tif``, which nothing opens), so a remote scene is kept as the text the user
gave, in a :class:`RemoteScene`: a ``str`` that answers the few questions the pipeline asks of a path
(``name``, ``stem``, ``suffix``, ``exists()``). rasterio opens it as written (it turns ``http(s)://``
and ``s3://`` into GDAL's ``/vsicurl/`` and ``/vsis3/`` itself). Whether it can really be read is
found out by opening it, which gives GDAL's own error (unreachable host, HTTP 404, no credentials).
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from urllib.parse import urlsplit

#: URL schemes rasterio hands to GDAL's virtual file systems
URL_SCHEMES = ("http", "https", "ftp", "s3", "gs", "az", "azure", "oss", "swift", "file")
_URL = re.compile(rf"^(?:{'|'.join(URL_SCHEMES)})://", re.IGNORECASE)


def is_remote(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names a scene GDAL opens by name rather than a local path."""
    if isinstance(text, RemoteScene):
        return True
    s = os.fspath(text)
    return s.startswith("/vsi") or bool(_URL.match(s)) and not s.lower().startswith("file://")


class RemoteScene(str):
    """A scene named by a ``/vsi...`` path or a URL, kept exactly as written."""

    @property
    def url_path(self) -> str:
        """The path part: ``/vsicurl/http://h/a/b.tif`` -> ``/a/b.tif``, ``/vsis3/bucket/k.tif`` -> ``/bucket/k.tif``."""
        s = str(self)
        for prefix in ("/vsicurl/", "/vsicurl_streaming/"):
            if s.startswith(prefix):
                s = s[len(prefix):]
        if _URL.match(s):
            parts = urlsplit(s)
            return f"/{parts.netloc}{parts.path}" if parts.scheme.lower() in ("s3", "gs", "az", "azure", "oss", "swift") else parts.path
        m = re.match(r"^/vsi[a-z0-9_]+/(.*)$", s)
        return "/" + (m.group(1) if m else s.lstrip("/"))

    @property
    def host(self) -> str:
        """The host (URLs) or bucket (object stores), for an output folder name."""
        s = str(self).removeprefix("/vsicurl/").removeprefix("/vsicurl_streaming/")
        if _URL.match(s):
            parts = urlsplit(s)
            return parts.netloc if parts.scheme.lower() in ("http", "https", "ftp") else ""
        return ""

    @property
    def name(self) -> str:
        return posixpath.basename(self.url_path.rstrip("/")) or "scene"

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0] or self.name

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def exists(self) -> bool:
        return True  # opening it is the check, with GDAL's own message

    def is_dir(self) -> bool:
        return False

    def is_file(self) -> bool:
        return True

    def __fspath__(self) -> str:
        return str(self)


#: GDAL's network settings for remote scenes, unless the environment sets them: give up on a host
#: that does not answer (GDAL's default is to wait as long as the system does), retry brief errors,
#: and do not list the remote folder of every scene on open.
NETWORK_DEFAULTS = {
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MAX_RETRY": "2",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}


def scene_path(scene: str | os.PathLike[str]) -> Path | RemoteScene:
    """A local scene as a :class:`Path`; a remote one as a :class:`RemoteScene` (never through ``Path``).

    The first remote scene also puts :data:`NETWORK_DEFAULTS` into the environment where unset
    (GDAL reads its configuration from there).
    """
    if isinstance(scene, RemoteScene):
        return scene
    text = scene if isinstance(scene, str) else os.fspath(scene)
    if is_remote(text):
        for key, value in NETWORK_DEFAULTS.items():
            os.environ.setdefault(key, value)
        return RemoteScene(text)
    return Path(text)
