"""``python -m inhercc``."""

from inhercc.cli import main

main()
