"""Persona knowledge: facts and labelled queries on disk, validated into dataclasses."""
