"""What travels and is stored: tasks and chunks, results, timing, schedule arithmetic.

Every side imports this floor (the client, brokers, consumers); it imports none of them, and nothing
in it touches a socket, a thread, a clock it was not handed, or a disk.
"""
