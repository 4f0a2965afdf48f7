"""Screenshot of Model Explorer showing a converted model, as kept in docs/inspect/model_explorer.png.

Needs the optional extra (``pip install 'mhc_rewrite[explore]'``), ``selenium``, and Chromium with its driver
(Debian: ``apt-get install chromium chromium-driver``). Runs headless:

    python -m mhc_rewrite inspect examples/factories.py:tiny_llama --explore-out /tmp/explore
    python docs/inspect/explorer_screenshot.py /tmp/explore docs/inspect/model_explorer.png

It serves the files, opens the page, searches for the first site's ``coefficients`` node, selects it (Model
Explorer expands the layers down to it and lists its attributes: the site's Amax gains, H_res, H_pre, H_post),
and saves the window.
"""

import argparse
import subprocess
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

SERVER = """
import sys, model_explorer
config = model_explorer.config()
config.add_model_from_path(sys.argv[1] + "/graphs.json")
config.add_node_data_from_path(sys.argv[1] + "/amax_gain_node_data.json")
print("url: http://localhost:%s/?data=%s" % (sys.argv[2], config.to_url_param_value()), flush=True)
model_explorer.visualize_from_config(config, port=int(sys.argv[2]), no_open_in_browser=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="what --explore-out wrote")
    parser.add_argument("png", help="the screenshot to write")
    parser.add_argument("--port", default="8731")
    parser.add_argument("--search", default="coefficients", help="the node to find and select")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER, args.folder, args.port], stdout=subprocess.PIPE,
                              text=True)
    try:
        url = server.stdout.readline().split("url: ", 1)[1].strip()
        time.sleep(5)  # the server loads its adapters
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                     "--use-angle=swiftshader", "--window-size=1600,1000"):
            options.add_argument(flag)
        options.binary_location = "/usr/bin/chromium"
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(url)
            time.sleep(15)  # the graph is laid out in a web worker and drawn with WebGL (software, headless)
            box = driver.find_element(By.CSS_SELECTOR, "search-bar input")
            box.click()
            box.send_keys(args.search)
            time.sleep(3)
            hit = next(e for e in driver.find_elements(By.CSS_SELECTOR, "span.node-label") if e.text == args.search)
            ActionChains(driver).key_down(Keys.ALT).click(hit).key_up(Keys.ALT).perform()  # locate and select
            time.sleep(3)
            close = [e for e in driver.find_elements(By.CSS_SELECTOR, "search-bar mat-icon") if e.text == "close"]
            if close:
                close[0].click()  # hide the search results, keep the selection
            time.sleep(5)
            driver.save_screenshot(args.png)
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
