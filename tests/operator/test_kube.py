"""Tests for the API paths the operator's client builds."""

from __future__ import annotations

from loraplex_operator.kube import object_path, path_of


def test_core_and_group_paths() -> None:
    assert object_path("v1", "configmaps", "ns", "x") == "/api/v1/namespaces/ns/configmaps/x"
    assert object_path("apps/v1", "statefulsets", "ns") == "/apis/apps/v1/namespaces/ns/statefulsets"
    assert (
        object_path("loraplex.dev/v1alpha1", "sharedbasepools", "ns", "p", "scale")
        == "/apis/loraplex.dev/v1alpha1/namespaces/ns/sharedbasepools/p/scale"
    )


def test_path_of_a_manifest() -> None:
    manifest = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "ns"}}
    assert path_of(manifest) == "/api/v1/namespaces/ns/services/s"
    assert path_of(manifest, named=False) == "/api/v1/namespaces/ns/services"
