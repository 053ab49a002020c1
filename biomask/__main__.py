from biomask.cli import main

raise SystemExit(main())
