"""Tests for the operator's kopf settings: annotation prefix, finalizer, peering modes."""

from __future__ import annotations

import kopf

from loraplex_operator.main import build_settings


def test_progress_and_diff_base_live_under_the_loraplex_prefix() -> None:
    settings = build_settings()
    assert settings.persistence.finalizer == "loraplex.dev/finalizer"
    progress = settings.persistence.progress_storage
    diffbase = settings.persistence.diffbase_storage
    assert isinstance(progress, kopf.AnnotationsProgressStorage) and progress.prefix == "loraplex.dev"
    assert isinstance(diffbase, kopf.AnnotationsDiffBaseStorage) and diffbase.prefix == "loraplex.dev"
    assert diffbase.key == "last-handled-configuration"


def test_standalone_by_default_and_mandatory_peering_when_named() -> None:
    alone = build_settings()
    assert alone.peering.standalone and not alone.peering.mandatory
    peered = build_settings(peering="loraplex", standalone=False, clusterwide=True)
    assert not peered.peering.standalone and peered.peering.mandatory
    assert peered.peering.name == "loraplex" and peered.peering.clusterwide


def test_only_trainer_pods_are_watched() -> None:
    selectors = build_settings().watching.label_selectors
    assert list(selectors.values()) == ["loraplex.dev/pool"]


def test_peered_replicas_get_distinct_priorities() -> None:
    """Equal priorities make kopf freeze every peer; each replica must draw its own."""
    priorities = {build_settings(peering="loraplex", standalone=False).peering.priority for _ in range(5)}
    assert len(priorities) == 5 and all(p > 0 for p in priorities)
