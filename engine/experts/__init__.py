"""Optional experts of this repository, beyond the paper's stages: every ``Expert`` subclass
(engine/stages/expert.py) of a module here is found by the registry (engine/core/registry.py) and
runs when ``--experts`` names it; engine/ARCHITECTURE.md shows how to add one."""
