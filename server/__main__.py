from server.cli import main

if __name__ == "__main__":  # lane processes (spawned) import this module again
    main()
