/* ProcessPrng, the one function of Windows' bcryptprimitives.dll that Rust's
 * standard library imports (for its random hash seeds). Wine before 9.0 has
 * no such DLL, so Windows test programs built by Rust 1.78+ fail to load
 * under Debian 12's Wine 8; scripts/windows-wine-tests.sh builds this stand-in
 * with mingw-w64 and puts it in the Wine prefix. It forwards to RtlGenRandom
 * (advapi32's SystemFunction036), which Wine has. */
#include <windows.h>
#include <ntsecapi.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!RtlGenRandom(data, n)) return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
