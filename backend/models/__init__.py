"""Offline base models of the local platform: the registry and the builders."""
