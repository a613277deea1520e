/* Intel AMX (tile matrix unit, Sapphire Rapids and later) helpers shared by the kernels that run
 * bfloat16 products as tile products where the build targets AMX (-march=native on such a CPU):
 * MESH_AMX is defined then. mesh_amx_ready() (moe_experts.c) asks the OS for tile state once per
 * process and says whether tiles may be used now (mesh_set_amx(0) turns them off). */
#ifndef MESH_AMX_H
#define MESH_AMX_H
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__x86_64__) && defined(__AVX512F__)
#define MESH_AMX 1
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

int mesh_amx_ready(void);

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg_t;

/* Every thread that runs tiles configures them first (8 tiles of 16 rows x 64 bytes) and releases
 * them (_tile_release) when done. */
static inline void amx_begin(void) {
    amx_cfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}
#endif
#endif
