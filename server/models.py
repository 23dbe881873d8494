"""The model repository: every package under one directory, each with its engine and scheduler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from export.package import MANIFEST_FILE, ModelPackage
from server.config import ServerConfig
from server.engine.cpu_budget import oversubscription_warning
from server.engine.lanes import LaneEngine
from server.engine.session import int8_saturation_warning
from server.errors import InvalidRequest, ModelNotFound
from server.metrics import Metrics
from server.scheduler import Scheduler

log = logging.getLogger("parley.models")


@dataclass
class LoadedModel:
    name: str
    package: ModelPackage
    engine: LaneEngine
    scheduler: Scheduler

    @property
    def max_input_tokens(self) -> int:
        return self.engine.max_source_tokens


class ModelRegistry:
    def __init__(self, models: list[LoadedModel], default: str):
        self.models = {m.name: m for m in models}
        self.default = default

    def resolve(self, name: str, source_language: str = "", target_language: str = "") -> LoadedModel:
        """The model named, else the one serving the languages given (the default model if it
        does), else the default model. Languages given with a name must be the model's."""
        if name:
            if name not in self.models:
                raise ModelNotFound(f"no model named '{name}'; this server has: {', '.join(sorted(self.models))}")
            model = self.models[name]
            if not _serves(model, source_language, target_language):
                raise InvalidRequest(f"model '{name}' translates {model.package.source_language}->"
                                     f"{model.package.target_language}, not {source_language or '*'}->"
                                     f"{target_language or '*'}; name another model or leave the languages empty")
            return model
        if source_language or target_language:
            matches = [m for m in self.models.values() if _serves(m, source_language, target_language)]
            if not matches:
                pairs = ", ".join(f"{m.package.source_language}->{m.package.target_language}" for m in self.models.values())
                raise ModelNotFound(f"no model translates {source_language or '*'}->{target_language or '*'}; "
                                    f"this server has: {pairs}")
            return self.models[self.default] if self.models[self.default] in matches else matches[0]
        return self.models[self.default]

    def __iter__(self):
        return iter(self.models.values())


def _serves(model: LoadedModel, source_language: str, target_language: str) -> bool:
    """Whether the model translates these languages (an empty one: any)."""
    return source_language in ("", model.package.source_language) and \
        target_language in ("", model.package.target_language)


def find_packages(repository: Path) -> list[Path]:
    """Package directories in a repository (or the repository itself, if it is one package)."""
    if (repository / MANIFEST_FILE).is_file():
        return [repository]
    return sorted(p.parent for p in repository.glob(f"*/{MANIFEST_FILE}"))


def load_models(config: ServerConfig, metrics: Metrics) -> ModelRegistry:
    paths = find_packages(config.model_repository)
    if not paths:
        raise FileNotFoundError(f"no model packages in {config.model_repository} (a package is a directory with "
                                f"{MANIFEST_FILE}; build the default one with `make export`)")
    # Names and the default come from the manifests: checked before any engine starts its lanes.
    packages = [ModelPackage.load(path) for path in paths]
    names = [package.name for package in packages]
    shared = {name: [p.root.name for p in packages if p.name == name] for name in names if names.count(name) > 1}
    if shared:
        raise ValueError(f"model names must be unique in {config.model_repository}: " + "; ".join(
            f"'{name}' names {' and '.join(directories)}" for name, directories in shared.items()))
    default = config.default_model or names[0]
    if default not in names:
        raise ValueError(f"default model '{default}' is not in {config.model_repository} (has {', '.join(names)})")
    models: list[LoadedModel] = []
    try:
        for package in packages:
            engine = LaneEngine(package, precision=None if config.precision == "auto" else config.precision,
                                device=None if config.device == "auto" else config.device, threads=config.threads,
                                lanes=config.lanes)
            models.append(LoadedModel(package.name, package, engine, Scheduler(package.name, engine, config, metrics)))
            metrics.model_info.labels(package.name, f"{package.name}/{engine.precision}", engine.precision,
                                      engine.device).set(1)
            log.info("loaded model", extra={"model": package.name, "precision": engine.precision,
                                            "device": engine.device, "lanes": config.lanes,
                                            "threads_per_lane": engine.lane_threads or "onnxruntime's default",
                                            "path": str(package.root)})
            for warning in (int8_saturation_warning(package, engine.precision, engine.device),
                            oversubscription_warning(config.lanes, engine.lane_threads, engine.device)):
                if warning:
                    log.warning(warning, extra={"model": package.name})
    except BaseException:
        for model in models:  # their lane processes
            model.engine.close()
        raise
    return ModelRegistry(models, default)
