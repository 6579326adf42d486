"""The relay: a driver outside the workers' network reaches its brokers through an actor inside it.

- :mod:`zdq.relay.actor`: the Relay actor, one DEALER per broker, on a worker;
- :mod:`zdq.relay.tunnel`: the driver's end, inproc sockets its links connect to, and the calls
  that carry their messages to the actor and back;
- :mod:`zdq.relay.path`: placing the actor, and placing it again when it fails.
"""

from zdq.relay.actor import Relay
from zdq.relay.path import RelayPath
from zdq.relay.tunnel import Tunnel

__all__ = ["Relay", "RelayPath", "Tunnel"]
