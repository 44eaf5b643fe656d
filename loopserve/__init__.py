"""The ``loopserve`` command's root (``loopserve/cli.py``): it sits above every package so that
no package has to import the ones beside it to offer its command."""
