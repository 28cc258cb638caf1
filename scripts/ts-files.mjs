// ts-files.mjs — the TypeScript sources below a directory, for the lint scripts (check-imports,
// check-size): every `.ts` file, declaration files (`.d.ts`) excluded, in directory order.
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

export function tsFilesUnder(dir, out = []) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) tsFilesUnder(path, out);
    else if (entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) out.push(path);
  }
  return out;
}
