"""Refuses to build the package without its generated files (`make proto` writes them): a
wheel without the modules would install and then fail at the first import, and one without
`openapi.json` would lack the REST paths' document."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGE = Path(__file__).parent / "convergence"
GENERATED = (PACKAGE / "v1" / "run_service_pb2.py", PACKAGE / "openapi.json")


class BuildWithGeneratedCode(build_py):
    def run(self) -> None:
        # An editable install reads the source tree, which `make proto` fills afterwards.
        missing = [path for path in GENERATED if not path.is_file()]
        if not self.editable_mode and missing:
            raise SystemExit(
                f"{missing[0]} is missing: run `make proto` (in the repository root) before "
                "building the convergence-client package"
            )
        super().run()


setup(cmdclass={"build_py": BuildWithGeneratedCode})
