// The columns of a row's `stats` and `factors`, as src/config.rs names them
// (`Stat`, `Factor`; a test there holds the two together).
#pragma once

enum Stat { STAT_CE, STAT_LSE, STAT_LOGIT_SUM, STAT_CORRECT, STATS };
enum Factor { FACTOR_G_CE, FACTOR_G_LSE, FACTOR_G_SUM, FACTOR_LSE, FACTOR_CE, FACTORS };
