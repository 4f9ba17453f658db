"""Imported first by the sweep's fork server (execute.PRELOAD), and by nothing else: the fork server
dies with the sweep process (orphans.die_with_parent)."""

from gradexp.sweep.orphans import die_with_parent

die_with_parent()
