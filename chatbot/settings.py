"""The settings, checked: one pydantic model made from DEFAULTS (chatbot/__init__.py).

A setting's type is its default's type (a default of None: text, or unset), so
a new setting needs only its line in DEFAULTS. On top of that: every number is
zero or more; seconds (`*_TIMEOUT`, `*_KEEPALIVE`, `*_SECONDS`, `*_GRACE`) may
have a fraction, and are more than zero but for a grace; and the few settings
with a fixed set of values take only those. create_app and gunicorn.conf.py both check through here, so a bad value
stops the start with one line that names its variable.
"""
import json
from typing import Literal, Optional

import click
from pydantic import ConfigDict, Field, ValidationError, create_model

from . import DEFAULTS

PREFIX = "CHATBOT_"
CHOICES = {
    "LLM_PROTOCOL": ("midm", "openai"),
    "AUTH": ("required", "disabled"),
}
AT_LEAST_ONE = {"WORKERS", "THREADS", "DB_POOL_SIZE"}


class SettingsError(click.ClickException, ValueError):
    """A setting with a value it cannot take; the message names its variable.
    (A ClickException, so that the flask CLI says it in one line too.)"""


SECONDS = ("_TIMEOUT", "_KEEPALIVE", "_SECONDS", "_GRACE")


def _field(name, default):
    if name in CHOICES:
        return Literal[CHOICES[name]], default
    if default is None:
        return Optional[str], None
    if name.endswith(SECONDS):
        return float, Field(default, ge=0) if name.endswith("_GRACE") else Field(default, gt=0)
    if type(default) in (int, float):
        return type(default), Field(default, ge=1 if name in AT_LEAST_ONE else 0)
    return type(default), default


Settings = create_model(
    "Settings",
    __config__=ConfigDict(extra="ignore", coerce_numbers_to_str=True),
    **{name: _field(name, default) for name, default in DEFAULTS.items()},
)


def from_environ(environ):
    """The settings given in the environment (CHATBOT_<NAME>), unchecked.

    Text settings are taken as written; the others are read as JSON where they
    parse (5, 0.5, true), as Flask's from_prefixed_env does.
    """
    values = {}
    for name, default in DEFAULTS.items():
        raw = environ.get(PREFIX + name)
        if raw is None:
            continue
        if default is None or isinstance(default, str):
            values[name] = raw
        else:
            try:
                values[name] = json.loads(raw)
            except ValueError:
                values[name] = raw
    return values


def check(values):
    """Every setting of DEFAULTS, checked and converted (e.g. "5" -> 5), from
    `values` (a mapping such as app.config); SettingsError names what is wrong."""
    try:
        settings = Settings.model_validate({name: values[name] for name in DEFAULTS if name in values})
    except ValidationError as e:
        problems = [f"{PREFIX}{error['loc'][0]}={_shown(error['loc'][0], values)}: {error['msg']}"
                    for error in e.errors()]
        raise SettingsError("Invalid setting: " + "; ".join(problems)) from None
    return settings.model_dump()


def _shown(name, values):
    return "(hidden)" if name.endswith(("_KEY", "_TOKEN")) else repr(values.get(name))


def load(environ):
    """The settings in force for this environment: DEFAULTS, then CHATBOT_* (checked)."""
    return check({**DEFAULTS, **from_environ(environ)})
