import sys

from pipeline.experiments import main

sys.exit(main())
