"""The configuration as a whole, checked before a process serves anything.

Each file is parsed by its own loader, and a file that does not parse stops start-up there.
This module checks what the files and settings name in one another: every tier named
exists in the catalog (an unknown tier must never be read as some other tier); each voice
preset's and assistant profile's model exists, is of the right kind, and is allowed for
every tier that may use the preset or profile (for a preset, the model each tier gets: its
`tier_models` entry, else `model`); each context URL is on an allowed host; each
upstream's key variable is set (unless the gateway is simulated and calls no upstream).
Every problem is reported at once, naming its file or variable and the item, so an
operator fixes them all in one pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from app.config import Settings
from app.realtime.presets import VoicePreset, VoicePresets, load_voice_presets
from app.registry import Catalog, ModelKind, load_catalog
from app.threads.context import host_allowed
from app.threads.profiles import Profiles, load_profiles


@dataclass(frozen=True, slots=True)
class Configuration:
    """The catalog, the assistant profiles and the voice presets, checked against one another."""

    catalog: Catalog
    profiles: Profiles
    presets: VoicePresets


class ConfigurationError(RuntimeError):
    """The configuration refers to things that do not exist or are not allowed; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"refusing to start, the configuration is inconsistent:\n{lines}")


def load_configuration(settings: Settings) -> Configuration:
    """Load every configuration file and check them together; `ConfigurationError` lists what is wrong."""
    configuration = Configuration(
        catalog=load_catalog(settings.catalog_file),
        profiles=load_profiles(settings.assistants_file),
        presets=load_voice_presets(settings.assistants_file),
    )
    problems = configuration_problems(settings, configuration)
    if problems:
        raise ConfigurationError(problems)
    return configuration


def configuration_problems(settings: Settings, configuration: Configuration) -> list[str]:
    """Why this configuration must not serve: one line per problem, empty when it may."""
    catalog = configuration.catalog
    problems: list[str] = []
    if settings.jwt_default_tier not in catalog.tiers:
        problems.append(
            f"JWT_DEFAULT_TIER {settings.jwt_default_tier!r} is not a tier of CATALOG_FILE {settings.catalog_file}"
            f" (tiers: {', '.join(catalog.tiers)})"
        )
    for upstream in catalog.upstreams:
        if not settings.simulated and not os.environ.get(upstream.api_key_env):
            problems.append(
                f"CATALOG_FILE {settings.catalog_file}: upstream {upstream.name!r} reads its key from"
                f" {upstream.api_key_env}, which is not set"
            )
    assistants = f"ASSISTANTS_FILE {settings.assistants_file}"
    for name, preset in configuration.presets.presets.items():
        problems += preset_problems(catalog, f"{assistants}: voice_preset.{name}", preset)
    for name, profile in configuration.profiles.profiles.items():
        where = f"{assistants}: profile.{name}"
        problems += usable_problems(catalog, where, profile.model, "chat", profile.tiers)
        if profile.context_url is not None and not host_allowed(profile.context_url, settings.context_allowed_hosts):
            problems.append(
                f"{where}: context_url {profile.context_url} is not on a host of CONTEXT_ALLOWED_HOSTS"
                f" ({', '.join(settings.context_allowed_hosts)})"
            )
    return problems


def preset_problems(catalog: Catalog, where: str, preset: VoicePreset) -> list[str]:
    """Problems of a voice preset: every tier that may use it must be allowed the model it gets
    (its `tier_models` entry, else `model`), and `tier_models` may name only such tiers."""
    users = list(catalog.tiers) if preset.tiers is None else preset.tiers
    # `model` answers the tiers `tier_models` leaves out; checked like a profile's when it names none.
    rest = [tier for tier in users if tier not in preset.tier_models] if preset.tier_models else preset.tiers
    problems = usable_problems(catalog, where, preset.model, "realtime", rest)
    for tier, model in preset.tier_models.items():
        entry = f"{where}: tier_models.{tier}"
        if tier not in catalog.tiers:
            known = ", ".join(catalog.tiers)
            problems.append(f"{entry}: tier {tier!r} (model {model!r}) is not a tier of the catalog ({known})")
            continue
        if tier not in users:
            problems.append(
                f"{entry}: tier {tier!r} (model {model!r}) is not among the preset's tiers ({', '.join(users)})"
            )
            continue
        spec = catalog.by_name.get(model)
        if spec is None or spec.kind != "realtime":
            what = "not in the catalog" if spec is None else f"of kind {spec.kind!r}, not 'realtime'"
            problems.append(f"{entry}: model {model!r} is {what}")
        elif not catalog.may_use(tier, spec):
            allowed = [other.id for other in catalog.models_for(tier) if other.kind == "realtime"]
            problems.append(
                f"{entry}: model {model!r} is not allowed for tier {tier!r};"
                f" name a realtime model it may use ({', '.join(allowed) or 'none'}) or allow the model there"
            )
    return problems


def usable_problems(catalog: Catalog, where: str, model: str, kind: ModelKind, tiers: list[str] | None) -> list[str]:
    """Problems of an item that answers with `model` for `tiers` (None: every tier)."""
    problems = []
    known = ", ".join(catalog.tiers)
    unknown = [tier for tier in tiers or () if tier not in catalog.tiers]
    if unknown:
        problems.append(f"{where}: tiers {', '.join(map(repr, unknown))} are not tiers of the catalog ({known})")
    spec = catalog.by_name.get(model)
    if spec is None or spec.kind != kind:
        what = "not in the catalog" if spec is None else f"of kind {spec.kind!r}, not {kind!r}"
        return [*problems, f"{where}: model {model!r} is {what}"]
    users = [tier for tier in (catalog.tiers if tiers is None else tiers) if tier in catalog.tiers]
    denied = [tier for tier in users if not catalog.may_use(tier, spec)]
    if denied:
        allowed = [tier for tier in catalog.tiers if catalog.may_use(tier, spec)]
        problems.append(
            f"{where}: model {model!r} is not allowed for tiers {', '.join(map(repr, denied))};"
            f" set its `tiers` to those that may use it ({', '.join(allowed) or 'none'}) or allow the model there"
        )
    return problems
