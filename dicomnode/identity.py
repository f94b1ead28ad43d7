"""The node's own identity, as it signs the objects it writes.

Results carry it as their Manufacturer, and routing refuses any instance that carries it, so
that a result a PACS forwards back is never processed again. Both rooms read it from here so
that the two can never disagree.
"""

from __future__ import annotations

#: Manufacturer (0008,0070) of every result; an instance with this Manufacturer is ours.
NODE_MANUFACTURER = "dicomnode"
