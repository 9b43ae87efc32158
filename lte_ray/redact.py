"""Credentials out of what lte-ray prints or stores: an MLflow URI or Ray address such as
`https://user:secret@mlflow.example.com/` or `http://host/?token=abc` becomes
`https://***@mlflow.example.com/`, `http://host/?token=***`. MLflow and Ray still get the real
value; summary.json, config.yaml, the MLflow params, a sweep's best_config.json, the checkpoint's
metadata and the console get this one.
"""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# Query keys whose values are secrets (matched anywhere in the key, any case): token, api_key,
# password, X-Amz-Signature, client_secret, auth, ...
SECRET_KEY = re.compile(r"token|passw|pwd|secret|key|sig|auth|credential", re.IGNORECASE)
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# The config fields that hold a URI or address (dotted section.key).
URI_FIELDS = ("tracking.mlflow_uri", "ray.address")


def _query(query: str) -> str:
    # Pair by pair on the raw text (not parse_qsl + urlencode), so everything else stays as written.
    pairs = []
    for pair in query.split("&"):
        key, sep, _ = pair.partition("=")
        pairs.append(f"{key}={MASK}" if sep and SECRET_KEY.search(unquote(key)) else pair)
    return "&".join(pairs)


def redact(uri: str) -> str:
    """`uri` with its user info and secret-looking query values replaced by `***`."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if not parts.netloc and "://" not in uri and "@" in uri:  # `user:pw@host:port` (no scheme)
        return f"{MASK}@{uri.rpartition('@')[2]}"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = _query(parts.query) if parts.query else parts.query
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # untouched, byte for byte (urlunsplit may normalise, e.g. drop an empty `?`)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def is_redacted(uri: str | None) -> bool:
    """Whether `uri` is a `redact`ed one, i.e. its credentials are gone (config.yaml of an earlier run)."""
    if not uri or MASK not in uri:
        return False
    parts = urlsplit(uri)
    if uri.startswith(f"{MASK}@") or parts.netloc.startswith(f"{MASK}@"):
        return True
    return any(p.partition("=")[2] == MASK and SECRET_KEY.search(unquote(p.partition("=")[0]))
               for p in parts.query.split("&"))


def secrets(uri: str) -> list[str]:
    """The credentials in `uri`, as written and percent-decoded: its user info, password and secret query values."""
    parts = urlsplit(uri)
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found += [userinfo, userinfo.partition(":")[2]]
    for pair in parts.query.split("&"):
        key, sep, value = pair.partition("=")
        if sep and SECRET_KEY.search(unquote(key)):
            found.append(value)
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)  # longest first: a password inside userinfo


def scrub(text: str, uri: str | None = None) -> str:
    """`text` (an error message, say) with every URL in it redacted, and `uri`'s credentials
    masked wherever they appear (a library may quote parts of the URI on their own)."""
    text = URL.sub(lambda m: redact(m.group(0)), text)
    for secret in secrets(uri) if uri else ():
        text = text.replace(secret, MASK)
    return text


def redacted_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of `Config.to_dict()` fit to store: `tracking.mlflow_uri` and `ray.address` redacted."""
    out = copy.deepcopy(cfg)
    for field in URI_FIELDS:
        section, key = field.split(".")
        value = out.get(section, {}).get(key)
        if isinstance(value, str):
            out[section][key] = redact(value)
    return out


def masked_fields(cfg: dict[str, Any]) -> list[str]:
    """The URI fields of `Config.to_dict()` that hold a redacted value (config.yaml of an earlier run)."""
    return [field for field in URI_FIELDS
            if is_redacted(cfg.get(field.split(".")[0], {}).get(field.split(".")[1]))]
