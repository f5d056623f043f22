"""Refuses to build the package without its generated modules (`make proto` writes them):
a wheel without them would install and then fail at the first import."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

GENERATED = Path(__file__).parent / "convergence" / "v1" / "run_service_pb2.py"


class BuildWithGeneratedCode(build_py):
    def run(self) -> None:
        # An editable install reads the source tree, which `make proto` fills afterwards.
        if not self.editable_mode and not GENERATED.is_file():
            raise SystemExit(
                f"{GENERATED} is missing: run `make proto` (in the repository root) before "
                "building the convergence-client package"
            )
        super().run()


setup(cmdclass={"build_py": BuildWithGeneratedCode})
